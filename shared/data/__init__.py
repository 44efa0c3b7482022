"""Data layer: formats -> split -> device store; fetch obtains ML-100K; windows = privacy unit.

Import from the submodules (e.g. `from shared.data.store import open_store`).
"""
