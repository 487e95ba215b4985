"""Files: fetched assets (models, corpus, datasets, zero-shot fixtures), exported model folders and
the model class they ship, token windows of text sources, atomic JSON."""
