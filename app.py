"""Hugging Face Spaces' entry point (README front matter: `app_file: app.py`): the demo, as `python -m demo`
starts it. Spaces runs `python app.py` in the repository root, so `cifar_core` and `demo` import from here as
they are, with no path edits (and without `pip install -e .`)."""
from demo.app import main

if __name__ == "__main__":
    main()
