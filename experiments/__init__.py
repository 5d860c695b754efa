"""Package placeholder: see DESIGN.md for what lives here."""
