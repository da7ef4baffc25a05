"""End-to-end jobs built from the models and samplers: text-to-image sampling."""
