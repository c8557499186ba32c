"""The backends floor: the model description and K/V layers; cpu/, gpu/, hf/."""
