"""Admin console forms: every field validates here so errors show inline beside it."""
from urllib.parse import urlparse

from flask_wtf import FlaskForm
from wtforms import BooleanField, IntegerField, PasswordField, SelectField, StringField
from wtforms.fields.choices import SelectChoice
from wtforms.widgets import PasswordInput
from wtforms.validators import (DataRequired, Email, InputRequired, Length, NumberRange,
                                Optional, ValidationError)

from models import (MAX_EXPIRY_DAYS, MAX_OUTPUT_CAP, MAX_PRIORITY, MAX_RPM, MAX_TPM, MAX_WEIGHT,
                    split_list)
from money import MAX_CREDITS, MAX_MULTIPLIER, parse_credits, parse_ratio_ppm

CHANNEL_TYPES = [
    SelectChoice("openai", "OpenAI-compatible (OpenAI, DeepSeek, Qwen, OpenRouter, vLLM, Ollama)"),
    SelectChoice("anthropic", "Anthropic"),
    SelectChoice("gemini", "Google Gemini"),
    SelectChoice("mock", "Mock (built in, no network)"),
]
REGISTRATION_MODES = [SelectChoice("open", "Open: anyone can register"),
                      SelectChoice("invite", "Invite: registering needs a redemption code"),
                      SelectChoice("closed", "Closed: only admins create accounts")]


def parse_models_spec(text):
    """'a, b, pub=upstream' -> [(public, upstream), ...]; ValueError with a readable reason."""
    pairs = []
    for item in split_list(text):
        public, sep, upstream = (part.strip() for part in item.partition("="))
        if not public or (sep and not upstream):
            raise ValueError(f"“{item}” is not “model” or “public=upstream”.")
        if any(public == seen for seen, _ in pairs):
            raise ValueError(f"Model “{public}” is listed twice.")
        pairs.append((public, upstream or public))
    if not pairs:
        raise ValueError("List at least one model, e.g. gpt-4o-mini,gpt-4o.")
    return pairs


class CreditsField(StringField):
    """A decimal number of credits (up to 6 places); `.micro` holds the parsed integer."""

    def __init__(self, label=None, validators=None, allow_negative=False, **kwargs):
        super().__init__(label, validators, **kwargs)
        self.allow_negative = allow_negative
        self.micro = None

    def pre_validate(self, form):
        self.micro = None
        text = (self.data or "").strip()
        if not text:
            return  # DataRequired/Optional decide whether blank is allowed
        try:
            self.micro = parse_credits(text, allow_negative=self.allow_negative)
        except ValueError:
            places = "" if self.allow_negative else "non-negative "
            raise ValidationError(f"Enter a {places}number up to {MAX_CREDITS:,} with at most "
                                  f"6 decimal places, e.g. 2.5.") from None


class ChannelForm(FlaskForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=100)])
    type = SelectField("Type", choices=CHANNEL_TYPES, default="openai")
    base_url = StringField("Base URL", validators=[Length(max=500)],
                           description="The provider's root, e.g. https://api.openai.com "
                                       "(a trailing /v1 is fine). Not needed for mock.")
    # hide_value=False: a form sent back with an error keeps the key the admin typed,
    # instead of dropping it silently (a GET of the edit page never fills it).
    api_key = PasswordField("API key", validators=[Length(max=4000)],
                            widget=PasswordInput(hide_value=False),
                            render_kw={"autocomplete": "new-password"})
    no_key = BooleanField("This upstream needs no API key",
                          description="For Ollama, vLLM or a proxy without authentication.")
    models = StringField("Models", validators=[DataRequired()],
                         description="Comma-separated; pub=upstream serves an upstream model "
                                     "under another public name.")
    priority = IntegerField("Priority", default=0, validators=[
        InputRequired(), NumberRange(min=-MAX_PRIORITY, max=MAX_PRIORITY)],
                            description="Higher is tried first.")
    weight = IntegerField("Weight", default=1,
                          validators=[InputRequired(), NumberRange(min=1, max=MAX_WEIGHT)],
                          description="Share among channels of equal priority.")
    enabled = BooleanField("Enabled", default=True)

    def validate_base_url(self, field):
        url = (field.data or "").strip().rstrip("/")
        field.data = url  # stored like the CLI stores it: no trailing slash
        if not url:
            if self.type.data != "mock":
                raise ValidationError("A base URL is required for this channel type.")
            return
        parts = urlparse(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValidationError("Enter an http:// or https:// URL, e.g. https://api.openai.com.")

    def validate_models(self, field):
        try:
            parse_models_spec(field.data)
        except ValueError as err:
            raise ValidationError(str(err)) from None


class PriceForm(FlaskForm):
    model = StringField("Model", validators=[DataRequired(), Length(max=200)])
    input = CreditsField("Input (credits per 1M tokens)", validators=[DataRequired()])
    output = CreditsField("Output (credits per 1M tokens)", validators=[DataRequired()])
    cached_input = CreditsField("Cached input (credits per 1M tokens)", validators=[Optional()],
                                description="Blank charges cached tokens at the input price.")
    per_request = CreditsField("Per request (credits)", validators=[Optional()],
                               description="A flat amount per call; blank means 0.")


class GroupForm(FlaskForm):
    name = StringField("Name", validators=[DataRequired(), Length(max=64)])
    models = StringField("Models", default="*", validators=[DataRequired()],
                         description="* for every model, or a comma-separated list.")
    rpm = IntegerField("Requests per minute", default=60,
                       validators=[InputRequired(), NumberRange(min=0, max=MAX_RPM)],
                       description="Per user; 0 is unlimited.")
    tpm = IntegerField("Tokens per minute", default=0,
                       validators=[InputRequired(), NumberRange(min=0, max=MAX_TPM)],
                       description="Per user; 0 is unlimited.")
    concurrency = IntegerField("Requests in flight", default=0,
                               validators=[Optional(), NumberRange(min=0)],
                               description="Per user, at once; 0 is unlimited.")
    multiplier = StringField("Price multiplier", default="1", validators=[DataRequired()],
                             description="1 is list price; 1.25 charges 25% more.")

    def validate_multiplier(self, field):
        try:
            self.multiplier_ppm = parse_ratio_ppm(field.data)
        except ValueError:
            raise ValidationError(f"Enter a non-negative decimal like 1 or 1.25, up to "
                                  f"{MAX_MULTIPLIER} (at most 6 decimal places).") from None

    def validate_models(self, field):
        field.data = ",".join(split_list(field.data)) if field.data.strip() != "*" else "*"
        if not field.data:
            raise ValidationError("Enter * or at least one model name.")


class UserCreateForm(FlaskForm):
    email = StringField("Email", validators=[DataRequired(), Email(check_deliverability=False),
                                             Length(max=254)])
    password = PasswordField("Password", validators=[DataRequired(), Length(min=8)],
                             render_kw={"autocomplete": "new-password"})
    group = SelectField("Group")
    is_admin = BooleanField("Administrator")


class PasswordForm(FlaskForm):
    password = PasswordField("New password", validators=[DataRequired(), Length(min=8)],
                             render_kw={"autocomplete": "new-password"})


class UserGroupForm(FlaskForm):
    group = SelectField("Group")


class BalanceForm(FlaskForm):
    direction = SelectField("Action", choices=[SelectChoice("credit", "Add credits"),
                                               SelectChoice("deduct", "Deduct credits")])
    amount = CreditsField("Amount (credits)", validators=[DataRequired()])
    note = StringField("Note", validators=[Optional(), Length(max=500)])

    def validate_amount(self, field):
        if field.micro == 0:
            raise ValidationError("Enter an amount above zero.")


class CodesForm(FlaskForm):
    amount = CreditsField("Credits per code", validators=[DataRequired()])
    count = IntegerField("How many", default=10, validators=[
        InputRequired(), NumberRange(min=1, max=1000)])
    expires_days = IntegerField("Expires after (days)", validators=[
        Optional(), NumberRange(min=1, max=MAX_EXPIRY_DAYS)],
                                description="Blank never expires.")

    def validate_amount(self, field):
        if field.micro == 0:
            raise ValidationError("A code must be worth more than zero.")


class SettingsForm(FlaskForm):
    registration = SelectField("Registration", choices=REGISTRATION_MODES)
    signup_bonus = CreditsField("Signup bonus (credits)", validators=[DataRequired()],
                                description="Credits every new account starts with.")
    default_output_cap = IntegerField(
        "Default output cap (tokens)",
        validators=[InputRequired(), NumberRange(min=1, max=MAX_OUTPUT_CAP)],
        description="Reserved for a request that does not set max_tokens.")
