"""The toolkit's shipped assets (the toy pipeline, its classifiers, split manifests), installed as package data."""
