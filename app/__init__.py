"""What mmkd's console apps share and the library does not need: options declared once on the stages'
configuration dataclasses (``options``), the command class, ``--config`` files and one-line errors
(``cli``), and the progress display (``progress``)."""
