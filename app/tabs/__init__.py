"""One module per tab of the app: each builds its components and wires them to its handlers."""
