"""The framework adapters against small real models, each framework in its own process."""
