"""The pure half of ``kubectl runs``: API objects in, JSON-ready records out (``views``).

The plugin itself (``services.kubectl_runs``) is a thin shell that fetches objects from the API
server, calls these functions with the current time and prints the records; everything a user
reads is computed here and unit-tested without a server.
"""
