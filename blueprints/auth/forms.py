"""Account forms: register, log in, log out, change password."""
from flask_wtf import FlaskForm
from wtforms import BooleanField, EmailField, PasswordField, StringField, SubmitField
from wtforms.validators import Email, EqualTo, InputRequired, Length, Optional

MIN_PASSWORD = 8  # bootstrap.create_user enforces the same floor


class RegisterForm(FlaskForm):
    email = EmailField("Email", validators=[InputRequired(), Email(check_deliverability=False),
                                            Length(max=254)])
    password = PasswordField("Password", validators=[InputRequired(), Length(min=MIN_PASSWORD)],
                             description=f"At least {MIN_PASSWORD} characters.")
    confirm = PasswordField("Repeat password", validators=[
        InputRequired(), EqualTo("password", message="The two passwords do not match.")])
    code = StringField("Invite code", validators=[Optional(), Length(max=64)],
                       description="Registration here needs a redemption code from an admin.")
    submit = SubmitField("Create account")


class LoginForm(FlaskForm):
    email = EmailField("Email", validators=[InputRequired(), Length(max=254)])
    password = PasswordField("Password", validators=[InputRequired()])
    remember = BooleanField("Keep me logged in")
    submit = SubmitField("Log in")


class LogoutForm(FlaskForm):
    submit = SubmitField("Log out")


class ChangePasswordForm(FlaskForm):
    current = PasswordField("Current password", validators=[InputRequired()])
    password = PasswordField("New password", validators=[InputRequired(), Length(min=MIN_PASSWORD)],
                             description=f"At least {MIN_PASSWORD} characters.")
    confirm = PasswordField("Repeat new password", validators=[
        InputRequired(), EqualTo("password", message="The two passwords do not match.")])
    submit = SubmitField("Change password")
