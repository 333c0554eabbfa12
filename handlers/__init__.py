"""Handlers: modules that do something with each stored event, switched on in config.ini."""
