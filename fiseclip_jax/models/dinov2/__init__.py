"""DINOv2 (transformers' Dinov2Model, no registers) in Flax: architecture and variants (`config`,
light), the port (`model`) and the tower object (`tower.Dinov2Tower`)."""
