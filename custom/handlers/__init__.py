"""Ignite handlers of this bundle's workflows."""
