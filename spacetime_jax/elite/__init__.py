"""ELITE: an image encoder that turns one image into words in one forward pass.

encoder.py (CLIP features, global and local mappers), params.py (the U-Net's trainable K/V
copies and local projections), conditioning.py (word injection, the per-layer contexts), data.py
(the tensorflow-datasets object-crop builder), pipeline.py (deterministic, resumable batches
with the method's augmentations), step.py (the two stages' losses and steps), train.py (the
`elite` job), personalize.py (one-pass personalization), importer.py (the official
checkpoints), artifact.py (the encoder folder a run writes and personalization reads).
"""
