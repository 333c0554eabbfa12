"""Sends a notification mail for each event through SMTP (STARTTLS, SSL or plain).

`subject` and `body` are templates: {contact.email}, {fields.First Name}, {lead-status.label},
{event.id}... are replaced by the event's values ({{ and }} for literal braces). The password
is read from the environment variable named by `password_env`, never from this file.
"""

import os
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

SETTINGS = {
    "host": ("localhost", "The SMTP server."),
    "port": ("587", "Its port: 587 for STARTTLS, 465 for SSL, 25 for plain."),
    "security": ("starttls", "starttls, ssl or none."),
    "user": ("", "Login name; empty: no login."),
    "password_env": ("", "The environment variable that holds the password (for example SMTP_PASSWORD)."),
    "ca_file": ("", "A CA certificate file to trust for the server (empty: the system's)."),
    "from": ("", "The sender address; required."),
    "to": ("", "Comma-separated recipients; required."),
    "subject": ("New Vbout contact: {contact.email}", "The subject template."),
    "body": ("\n    Vbout sent event {event.id} at {event.received_at}.\n\n    Email: {contact.email}\n"
             "    Phone: {contact.phone}\n    Lead status: {lead-status.label}\n    Profile: {contact.profile_url}",
             "The body template (indented lines)."),
}


def check(settings):
    options = {
        "host": settings.get("host", "").strip(), "port": settings.number("port", 1, 65535),
        "security": settings.choice("security", "starttls", "ssl", "none"),
        "user": settings.get("user", "").strip(), "password_env": settings.get("password_env", "").strip(),
        "ca_file": settings.path("ca_file"),
        "from": settings.get("from", "").strip(),
        "to": [a.strip() for a in settings.get("to", "").split(",") if a.strip()],
        "subject": settings.get("subject", ""),
        "body": "\n".join(line.strip() for line in settings.get("body", "").strip().splitlines()),
        "timeout": settings.timeout,
    }
    if "@" not in options["from"]:
        raise settings.error("from", "is not an email address", "listener@example.com")
    if not options["to"] or not all("@" in a for a in options["to"]):
        raise settings.error("to", "is not a list of email addresses", "you@example.com, sales@example.com")
    if options["ca_file"] and not os.path.isfile(options["ca_file"]):
        raise settings.error("ca_file", "is not a file", "a PEM file such as /etc/ssl/certs/my-ca.pem")
    if options["user"] and not options["password_env"]:
        raise settings.error("password_env", "is needed when user is set", "SMTP_PASSWORD")
    return options


def render(template, event):
    """The template with each {path} replaced by the event's value (empty when absent)."""
    out, i = [], 0
    while i < len(template):
        c = template[i]
        if template.startswith("{{", i) or template.startswith("}}", i):
            out.append(c)
            i += 2
        elif c == "{" and "}" in template[i:]:
            end = template.index("}", i)
            value = event.get(template[i + 1:end])
            out.append("" if value is None or isinstance(value, (dict, list)) else str(value))
            i = end + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def handle(event, options):
    message = EmailMessage()
    message["From"] = options["from"]
    message["To"] = ", ".join(options["to"])
    message["Subject"] = " ".join(render(options["subject"], event).split())  # no header injection
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = make_msgid("vbout-listener")
    message.set_content(render(options["body"], event) + "\n")
    password = None
    if options["user"]:
        password = os.environ.get(options["password_env"])
        if password is None:
            raise LookupError("the environment variable %s is not set" % options["password_env"])
    context = ssl.create_default_context(cafile=options["ca_file"])
    if options["security"] == "ssl":
        server = smtplib.SMTP_SSL(options["host"], options["port"], timeout=options["timeout"], context=context)
    else:
        server = smtplib.SMTP(options["host"], options["port"], timeout=options["timeout"])
    with server:
        if options["security"] == "starttls":
            server.starttls(context=context)
        if options["user"]:
            server.login(options["user"], password)
        refused = server.send_message(message)
    if refused:
        raise RuntimeError("refused recipients: %s" % ", ".join(sorted(refused)))
    return None
