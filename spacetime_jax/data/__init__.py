"""Data for personalization: concept image loading and prompt templates."""
