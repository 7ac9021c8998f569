"""Datasets: the EmojiScenes default benchmark and loaders for the paper's public datasets."""
