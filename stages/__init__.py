"""Pipeline stages. Each module has a pure `run()` and a thin `main()` that dvc.yaml calls."""
