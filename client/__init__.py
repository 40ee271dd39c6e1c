"""Hospital node: data, model and LoRA, local training, the Flower ClientApp."""
