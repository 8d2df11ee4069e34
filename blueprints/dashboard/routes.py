"""Console pages: dashboard (placeholder until its issue lands)."""
from flask import Blueprint

bp = Blueprint("dashboard", __name__)
