"""CLIP (OpenAI ViT and its text tower) in Flax: architecture and variants (`config`, light), the
port (`model`), the offline tokenizer, and the tower object the method runs (`tower.CLIPTower`)."""
