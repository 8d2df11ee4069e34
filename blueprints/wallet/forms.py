"""Wallet forms: redeem a code."""
from flask_wtf import FlaskForm
from wtforms import StringField, SubmitField
from wtforms.validators import InputRequired, Length


class RedeemForm(FlaskForm):
    code = StringField("Redemption code", validators=[
        InputRequired(message="Enter the code you were given."),
        Length(max=64, message="Codes are at most 64 characters long.")],
        description="A code from an admin adds its credits to your wallet once.")
    submit = SubmitField("Redeem")
