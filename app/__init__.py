"""The Gradio front end. Thin: every handler calls the engine (engine/ knows nothing of Gradio)."""
import os

# No outside connections from Gradio or the hub client unless the user opts in; set before gradio is imported.
for _name, _value in (("GRADIO_ANALYTICS_ENABLED", "False"), ("HF_HUB_DISABLE_TELEMETRY", "1")):
    os.environ.setdefault(_name, _value)
