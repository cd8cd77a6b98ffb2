import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="QueuedJob",
            fields=[
                ("job_id", models.CharField(max_length=50, primary_key=True, serialize=False)),
                (
                    "state",
                    models.CharField(
                        choices=[
                            ("QUEUED", "Queued"),
                            ("PROGRESS", "In progress"),
                            ("CANCELLED", "Cancelled"),
                            ("WAITING", "Waiting"),
                        ],
                        default="QUEUED",
                        max_length=64,
                    ),
                ),
                ("creation_date", models.DateTimeField(default=django.utils.timezone.now)),
                ("submission_id", models.IntegerField(blank=True, db_index=True, null=True)),
                (
                    "celery_task_id",
                    models.CharField(blank=True, max_length=50, null=True, unique=True),
                ),
            ],
            options={
                "verbose_name": "Queued job",
                "verbose_name_plural": "Queued jobs",
                "ordering": ["pk"],
            },
        ),
        migrations.CreateModel(
            name="SavedEnviron",
            fields=[
                ("id", models.AutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("environ", models.TextField(help_text="JSON-encoded evaluation environ")),
                (
                    "save_time",
                    models.DateTimeField(auto_now=True, help_text="Time and date when the environ was saved"),
                ),
                (
                    "queued_job",
                    models.OneToOneField(on_delete=django.db.models.deletion.CASCADE, to="evalmgr.queuedjob"),
                ),
            ],
        ),
    ]
