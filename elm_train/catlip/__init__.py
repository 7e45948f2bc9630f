"""CatLIP: image-text pre-training as classification over WordNet synsets mined from captions."""
