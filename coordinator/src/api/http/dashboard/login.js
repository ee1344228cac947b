// The login page: exchanges the single-use token in the link for a session
// cookie by a same-origin POST (a GET never logs in), then opens the dashboard.
"use strict";
(function () {
  const params = new URLSearchParams(location.search);
  const token = params.get("token") || "";
  // Keep the token out of the history and of anything shown later.
  history.replaceState(null, "", "/login");
  const msg = document.getElementById("msg");
  if (!token) {
    msg.textContent = "No token in this link. Run `farm dashboard` for a new one.";
    return;
  }
  fetch("/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: token }),
    credentials: "same-origin",
  }).then(function (r) {
    if (r.ok) {
      msg.textContent = "Logged in as admin.";
      location.replace("/#/");
    } else {
      msg.textContent = "This login link is used up, expired or unknown. Run `farm dashboard` for a new one.";
      document.body.dataset.login = "refused";
    }
  }).catch(function (e) {
    msg.textContent = "Login failed: " + e;
  });
})();
