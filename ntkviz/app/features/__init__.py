"""The job side of each feature: its requests (each with a ``run(engine)`` job), results and
Qt-free state. The GUI's views (``ntkviz.gui.features``) show them."""
