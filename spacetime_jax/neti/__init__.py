"""NeTI: a neural space-time mapper (timestep, U-Net layer) -> token embedding, and its use."""
