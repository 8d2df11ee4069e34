"""The /v1 gateway endpoints (thin: each hands its call to the relay)."""
from flask import Blueprint

bp = Blueprint("api", __name__, url_prefix="/v1")
