"""FiSeCLIP itself: SeCLIP's text alignment, FiCLIP's feature matching with mutual filtering,
references as data, fusion and maps, composed once as public stages (`pipeline`) behind the
library's entry points (`api`)."""
