"""The web dashboard under ``/ui``: its pages, session, views and the submit form laid out from the settings model."""
