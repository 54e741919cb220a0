# Homebrew formula for mlxserve: a Python application in its own virtual environment.
#
# Install (see the README's "Install"): tap this repository, then install from the tap:
#   brew tap mlxserve/mlxserve PATH-OR-GIT-REMOTE-OF-THIS-REPOSITORY
#   brew install mlxserve/mlxserve/mlxserve
#
# Where the source comes from. Homebrew wants a `url` for every formula. This repository has no
# published release tarball, and writing a file host's or package index's address into the repo
# would pin the project to a place it may never be published at. So the source is the tap itself:
# `brew tap` has already cloned this repository, and the formula clones its `main` branch from that
# local clone (a file-scheme address built at load time from this file's own location, so nothing
# host-specific is written here). `version` is mlxserve.__version__ (tests/test_distribution.py checks).
#
# Where the dependencies come from. requirements/macos-arm64.lock pins every runtime dependency
# (the closure of pyproject's [project].dependencies on macOS arm64, CPython below) by version and
# SHA-256; requirements/macos-arm64-build.lock pins the build backend the same way. pip installs
# them with --require-hashes from its default index, so any file that differs from the one locked
# is refused. Both locks are written by scripts/lock_requirements.py.

# MLX's Metal back-end needs Apple Silicon and macOS 14 or later; say so plainly anywhere else.
class AppleSiliconMacRequirement < Requirement
  fatal true

  satisfy(build_env: false) { OS.mac? && Hardware::CPU.arm? && MacOS.version >= :sonoma }

  def message
    <<~EOS
      mlxserve's Homebrew formula installs only on Apple-Silicon Macs (arm64) with macOS 14 or
      later: MLX runs on the Mac's GPU through Metal, which other machines do not have.
      On Linux, MLX's CPU back-end works: install mlxserve with pip from a clone of its
      repository instead (README, "Install": `pip install ".[cpu]"`).
    EOS
  end
end

class Mlxserve < Formula
  desc "Fast local LLM inference on MLX: OpenAI-compatible server, chat and benchmark"
  # `brew audit` wants an https homepage. The project has no published site yet; this is the
  # GitHub address the tap name (mlxserve/mlxserve) stands for. Change it where it is published.
  homepage "https://github.com/mlxserve/mlxserve"
  # The tap's own clone of this repository (Formula/ is one level below its root).
  url "file://#{File.expand_path("..", __dir__)}", using: :git, branch: "main"
  # A git source has no version of its own: src/mlxserve/__init__.py's __version__, repeated
  # (tests/test_distribution.py checks they are equal).
  version "0.1.0"
  license "Apache-2.0"

  depends_on AppleSiliconMacRequirement
  # The Python the locks are resolved for (scripts/lock_requirements.py reads it from here).
  depends_on "python@3.11"

  def install
    python = Formula["python@3.11"].opt_bin/"python3.11"
    # A plain venv, not Homebrew's virtualenv_create: that one makes it without pip and with the
    # system site-packages, and this install needs the venv's own pip for the hash-locked wheels.
    system python, "-m", "venv", libexec
    pip = [libexec/"bin/python", "-m", "pip", "--disable-pip-version-check", "--no-input"]
    locked = ["install", "--require-hashes", "--no-deps", "--only-binary=:all:", "-r"]
    # The build backend first (pinned), so building mlxserve itself fetches nothing unpinned.
    system(*pip, *locked, buildpath/"requirements/macos-arm64-build.lock")
    system(*pip, *locked, buildpath/"requirements/macos-arm64.lock")
    system(*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", buildpath)
    bin.install_symlink libexec/"bin/mlxserve"
  end

  def caveats
    <<~EOS
      The first `mlxserve run` or `mlxserve chat` downloads the default model
      (SmolLM2-135M-Instruct, 98 MB) into ~/.cache/mlxserve; `mlxserve pull --list`
      shows the other models it knows by name. `mlxserve doctor` checks this machine.
    EOS
  end

  test do
    ENV["MLXSERVE_CACHE"] = (testpath/"cache").to_s
    ENV["MLXSERVE_HOME"] = (testpath/"home").to_s
    assert_equal "mlxserve #{version}", shell_output("#{bin}/mlxserve --version").strip
    report = JSON.parse(shell_output("#{bin}/mlxserve doctor --json"))
    assert report["ok"], "mlxserve doctor reported a failed check: #{report["checks"]}"
    assert_equal version.to_s, report["mlxserve"]
    assert_equal "metal", report["backend"]
  end
end
