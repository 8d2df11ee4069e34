"""The create- and edit-key forms; their fields turn into ApiKey columns through `key_fields`."""
import ipaddress
from datetime import datetime, time, timedelta

from flask_wtf import FlaskForm
from wtforms import DateField, IntegerField, StringField, SubmitField
from wtforms.validators import InputRequired, Length, NumberRange, Optional, ValidationError

from models import MAX_EXPIRY_DAYS, MAX_RPM, split_list, utcnow
from money import format_credits, parse_credits


def parse_networks(text):
    """'10.0.0.0/8, 1.2.3.4' -> ['10.0.0.0/8', '1.2.3.4/32']; ValueError names the bad entry."""
    networks = []
    for item in split_list(text):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR range") from None
    return networks


class CreateKeyForm(FlaskForm):
    name = StringField("Name", validators=[InputRequired(), Length(max=100)],
                       render_kw={"placeholder": "e.g. laptop, ci, chat-app"})
    expires_days = IntegerField("Expires after (days)", validators=[
        Optional(), NumberRange(min=1, max=MAX_EXPIRY_DAYS)], description="Empty: never expires.")
    credit_limit = StringField("Credit limit", validators=[Optional(), Length(max=32)],
                               description="Credits this key may spend in total. Empty: no limit.")
    models = StringField("Allowed models", validators=[Optional(), Length(max=2000)],
                         description="Comma-separated. Empty: every model your group may use.")
    allowed_ips = StringField("Allowed IP ranges", validators=[Optional(), Length(max=2000)],
                              description="Comma-separated CIDRs, e.g. 10.0.0.0/8. Empty: any IP.")
    rpm = IntegerField("Requests per minute", default=0, validators=[
        Optional(), NumberRange(min=0, max=MAX_RPM)], description="0: no limit of its own.")
    tpm = IntegerField("Tokens per minute", default=0, validators=[
        Optional(), NumberRange(min=0, max=1_000_000_000)], description="0: no limit of its own.")
    concurrency = IntegerField("Requests in flight", default=0, validators=[
        Optional(), NumberRange(min=0, max=100_000)], description="0: no limit of its own.")
    submit = SubmitField("Create key")

    def validate_credit_limit(self, field):
        if field.data and field.data.strip():
            try:
                parse_credits(field.data)
            except ValueError as err:
                raise ValidationError(f"Enter an amount of credits, like 5 or 2.5 ({err}).") \
                    from None

    def validate_allowed_ips(self, field):
        try:
            parse_networks(field.data)
        except ValueError as err:
            raise ValidationError(f"{err}.") from None

    def key_fields(self):
        """The ApiKey column values this form describes (call after validation)."""
        limit = (self.credit_limit.data or "").strip()
        models = split_list(self.models.data)
        networks = parse_networks(self.allowed_ips.data)
        return {
            "expires_at": (utcnow() + timedelta(days=self.expires_days.data)
                           if self.expires_days.data else None),
            "credit_limit_micro": parse_credits(limit) if limit else None,
            "models": ",".join(models) or None,
            "allowed_ips": ",".join(networks) or None,
            "rpm": self.rpm.data or 0,
            "tpm": self.tpm.data or 0,
            "concurrency": self.concurrency.data or 0,
        }


class EditKeyForm(CreateKeyForm):
    """Rename a key or change its limits; expiry is a date here, since the key already exists."""
    expires_on = DateField("Expires on (UTC)", validators=[Optional()],
                           description="The key stops working at the start of this day. "
                                       "Empty: never expires.")
    submit = SubmitField("Save key")

    @classmethod
    def for_key(cls, key):
        """The form filled from `key`'s current settings."""
        form = cls(formdata=None, name=key.name,
                   expires_on=key.expires_at.date() if key.expires_at else None,
                   credit_limit=format_credits(key.credit_limit_micro)
                   if key.credit_limit_micro is not None else "",
                   models=", ".join(key.model_list), allowed_ips=", ".join(key.ip_list),
                   rpm=key.rpm)
        return form

    def key_fields(self):
        """As CreateKeyForm's, with the expiry from the date field."""
        self.expires_days.data = None
        values = super().key_fields()
        values["expires_at"] = (datetime.combine(self.expires_on.data, time.min)
                                if self.expires_on.data else None)
        return values
