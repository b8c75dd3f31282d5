"""Integrations of rankmoe with other libraries, installed as ``rankmoe.integrations``.

The diffusers and transformers helpers arrive with the recipe and training-plumbing work; this package
exists so that ``import rankmoe.integrations`` resolves from the start.
"""
