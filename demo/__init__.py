"""The embedded demo: a seeded data generator (`data`) and a tiny base model built from it (`model`)."""
