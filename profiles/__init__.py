"""Declarative IHE tables, loaded by :mod:`xdsi.profiles_loader`."""
