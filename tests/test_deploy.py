"""deploy/: the nginx example of README "Running several nodes" is valid nginx."""
import os
import shutil
import subprocess


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_nginx_example_passes_nginx_t(tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert os.path.exists(nginx), "nginx is missing: `make test` installs nginx-light"
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"events {{}}\nerror_log {tmp_path}/error.log;\npid {tmp_path}/nginx.pid;\n"
                    f"http {{\n  access_log off;\n"
                    f"  include {ROOT}/deploy/nginx.conf;\n}}\n")
    result = subprocess.run([nginx, "-t", "-c", str(conf)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    example = open(os.path.join(ROOT, "deploy", "nginx.conf")).read()
    assert "proxy_buffering off;" in example
