"""`personamagic ui`: a local web page to personalize and generate without a terminal.

jobs.py: the one-at-a-time job queue; studio.py: the library and the jobs, usable without a page;
app.py: the Gradio page; cli.py: the `ui` command. Nothing here is imported by the rest of the
package, and Gradio is imported only when the page is built.
"""
