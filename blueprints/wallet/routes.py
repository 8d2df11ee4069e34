"""Console pages: wallet (placeholder until its issue lands)."""
from flask import Blueprint

bp = Blueprint("wallet", __name__)
