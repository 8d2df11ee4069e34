"""Console pages: logs (placeholder until its issue lands)."""
from flask import Blueprint

bp = Blueprint("logs", __name__)
