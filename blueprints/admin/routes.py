"""Console pages: admin (placeholder until its issue lands)."""
from flask import Blueprint

bp = Blueprint("admin", __name__)
