"""Messaging: in-app notifications and notification email.

* :mod:`.rules` — which case event notifies whom, with what words (data, no I/O);
* :mod:`.recipients` — the users an audience of an event is (the ``auth_user`` table);
* :mod:`.notifications` — the case-event subscriber: a notification ``Communication`` per
  recipient and outbox emails for recipients who are offline, in the event's transaction;
* :mod:`.presence` — who is online (``touch_presence`` after each authenticated request);
* :mod:`.emails` — subject, body and deep link of a notification email;
* :mod:`.outbox` — the transactional email outbox: enqueue, claim, settle;
* :mod:`.smtp` — delivery over SMTP (:mod:`smtplib`);
* :mod:`.worker` — the background thread draining the outbox;
* :mod:`.service` — wiring for :func:`fhir_server.app.create_app`.
"""
