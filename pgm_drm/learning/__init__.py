"""Learning (EM, SVI, discriminative relaxation): see the learning issue."""

__all__: list[str] = []
