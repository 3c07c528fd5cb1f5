"""The offline model kit: a generated world of captioned images, and a small SigLIP and BLIP trained on it.

``world`` makes the data, ``train`` trains both models and writes them in the transformers format the real
loading code reads, ``evaluate`` measures retrieval on the held-out split. The trained kit is committed
under ``engines/kit/models`` (see its ``manifest.json``), so the demo and the tests never retrain.
"""

from pathlib import Path

KIT_DIR = Path(__file__).parent / "models"
