"""pdmer: personalized dynamic music emotion recognition (DSAML)."""
__version__ = "0.1.0"
