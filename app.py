"""AudioScribe: `python app.py [--profile NAME] [--set section.field=value ...]`, then open the printed URL.

The module-level ``demo`` follows Gradio's convention (``gradio app.py`` reload mode, Hugging Face Spaces); the
settings come from the command line and the AUDIOSCRIBE_* environment variables.
"""
import logging
import sys

from app.main import config_from_args, create_demo, launch_kwargs, parse_args
from engine.errors import AudioScribeError

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
try:
    config = config_from_args(parse_args(sys.argv[1:]))
    demo = create_demo(config)
except AudioScribeError as error:  # a bad setting, a missing model or datastore: say what, not a traceback
    sys.exit(f"error: {error}")

if __name__ == "__main__":
    demo.launch(**launch_kwargs(config))
