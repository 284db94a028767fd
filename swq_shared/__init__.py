"""What the API and the workers share: settings, database models, job state rules and storage.

One package instead of copies, so both sides read and write a job the same way.
"""
