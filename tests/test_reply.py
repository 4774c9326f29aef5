"""Tests for `esmtpkit.core.reply`: reply values, their wire form (RFC 5321 §4.2, RFC 2034) and `coerce`."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from esmtpkit.core.reply import Reply, SMTPReply, coerce, default_enhanced


class ReplyRenderTests(SynchronousTestCase):
    """`Reply.render` gives the exact wire bytes."""

    def test_single_line(self) -> None:
        self.assertEqual(Reply.of(250, "OK").render(), b"250 OK\r\n")

    def test_multi_line(self) -> None:
        """Every line but the last has a hyphen after the code (RFC 5321 §4.2.1)."""
        reply = Reply.of(250, "mx.test", "PIPELINING", "SIZE 100")
        self.assertEqual(reply.render(), b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 100\r\n")

    def test_enhanced_prefixes_every_line(self) -> None:
        reply = Reply.of(250, "a", "b", enhanced="2.1.0")
        self.assertEqual(reply.render(enhanced=True), b"250-2.1.0 a\r\n250 2.1.0 b\r\n")
        self.assertEqual(reply.render(), b"250-a\r\n250 b\r\n")

    def test_enhanced_default_by_code(self) -> None:
        """Without an explicit enhanced code, one that fits the basic code is used."""
        self.assertEqual(Reply.of(451, "later").render(enhanced=True), b"451 4.3.0 later\r\n")
        self.assertEqual(Reply.of(299, "x").render(enhanced=True), b"299 2.0.0 x\r\n")

    def test_no_enhanced_code_on_3xx(self) -> None:
        """RFC 3463 codes exist only for 2xx, 4xx and 5xx replies."""
        self.assertEqual(Reply.of(354, "go ahead").render(enhanced=True), b"354 go ahead\r\n")
        self.assertIsNone(default_enhanced(354))

    def test_enhanced_code_read_from_text(self) -> None:
        """A text that starts with an enhanced code of the same class gives the code; the text loses it."""
        reply = Reply.of(550, "5.1.1 No such user")
        self.assertEqual((reply.enhanced, reply.lines), ("5.1.1", ("No such user",)))
        self.assertEqual(reply.render(enhanced=True), b"550 5.1.1 No such user\r\n")
        self.assertEqual(reply.render(), b"550 No such user\r\n")

    def test_enhanced_code_of_other_class_stays_text(self) -> None:
        reply = Reply.of(250, "5.1.1 odd")
        self.assertEqual((reply.enhanced, reply.lines), (None, ("5.1.1 odd",)))

    def test_empty_text(self) -> None:
        """No text: the code alone (RFC 5321 §4.2: the SP comes only with a textstring)."""
        self.assertEqual(Reply.of(250).render(), b"250\r\n")
        self.assertEqual(Reply.of(250).render(enhanced=True), b"250 2.0.0\r\n")
        self.assertEqual(Reply.of(250, "", "x").render(), b"250-\r\n250 x\r\n")

    def test_line_breaks_cannot_inject_replies(self) -> None:
        reply = Reply.of(250, "a\r\n250 b\x00c")
        self.assertEqual(reply.render(), b"250 a  250 b c\r\n")

    def test_utf8_text(self) -> None:
        self.assertEqual(Reply.of(250, "caf\u00e9").render(), "250 caf\u00e9\r\n".encode())

    def test_str(self) -> None:
        self.assertEqual(str(Reply.of(550, "no", enhanced="5.7.1")), "550 5.7.1 no")
        self.assertEqual(str(Reply.of(250, "a", "b")), "250-a\r\n250 b")


class ReplyValueTests(SynchronousTestCase):
    """Invalid replies are refused when built, not when written."""

    def test_code_range(self) -> None:
        for code in (199, 600, 0, -250):
            self.assertRaises(ValueError, Reply.of, code, "x")
        self.assertRaises(ValueError, Reply, "250", ("x",))  # type: ignore[arg-type]

    def test_enhanced_must_match_class(self) -> None:
        self.assertRaises(ValueError, Reply.of, 250, "x", enhanced="5.0.0")
        self.assertRaises(ValueError, Reply.of, 250, "x", enhanced="2.0")

    def test_positive(self) -> None:
        self.assertTrue(Reply.of(250).is_positive)
        self.assertTrue(Reply.of(354).is_positive)
        self.assertFalse(Reply.of(421).is_positive)
        self.assertFalse(Reply.of(550).is_positive)

    def test_text(self) -> None:
        self.assertEqual(Reply.of(250, "a", "b").text, "a\nb")

    def test_text_not_split_into_characters(self) -> None:
        """``Reply(250, "OK")`` is one line, not a line per character."""
        self.assertEqual(Reply(250, "OK"), Reply.of(250, "OK"))  # type: ignore[arg-type]
        self.assertEqual(Reply(250, "OK").render(), b"250 OK\r\n")  # type: ignore[arg-type]

    def test_equality(self) -> None:
        self.assertEqual(Reply.of(250, "OK"), Reply(250, ("OK",)))
        self.assertNotEqual(Reply.of(250, "OK"), Reply.of(250, "OK", enhanced="2.0.0"))


class SMTPReplyTests(SynchronousTestCase):
    def test_from_parts(self) -> None:
        error = SMTPReply(550, "No such user", enhanced="5.1.1")
        self.assertEqual(error.reply, Reply.of(550, "No such user", enhanced="5.1.1"))
        self.assertEqual(str(error), "550 5.1.1 No such user")

    def test_from_reply(self) -> None:
        reply = Reply.of(451, "later")
        self.assertIs(SMTPReply(reply).reply, reply)


class CoerceTests(SynchronousTestCase):
    """`coerce` accepts what a handler may return and refuses the rest."""

    def test_reply(self) -> None:
        reply = Reply.of(250, "OK")
        self.assertIs(coerce(reply), reply)

    def test_tuple(self) -> None:
        self.assertEqual(coerce((250, "a", "b")), Reply.of(250, "a", "b"))
        self.assertEqual(coerce((250,)), Reply.of(250))

    def test_int(self) -> None:
        self.assertEqual(coerce(250), Reply.of(250))

    def test_garbage(self) -> None:
        for value in (None, "250 OK", True, (), ("250", "OK"), [250, "OK"], b"250", 2.5):
            self.assertRaises(TypeError, coerce, value)

    def test_bad_code(self) -> None:
        self.assertRaises(ValueError, coerce, (999, "x"))
