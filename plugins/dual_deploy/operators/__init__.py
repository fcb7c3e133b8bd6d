"""Custom operators. Each keeps execute() small; heavy libraries are imported inside it."""
