"""Forget/retain accuracy, PTQ gap, survival of an update under NF4, CAD."""
