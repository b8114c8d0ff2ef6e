"""The ``saliency`` commands that explain and describe from the shell: ``explain``, ``models`` and
``layers``. Without ``--url`` they run the engine in this process (the models loaded from the
settings as the server loads them); with ``--url`` they go through ``saliency_client``."""
