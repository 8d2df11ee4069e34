"""Console pages: keys (placeholder until its issue lands)."""
from flask import Blueprint

bp = Blueprint("keys", __name__)
