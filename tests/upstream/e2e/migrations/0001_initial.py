from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="StepLog",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("job_id", models.CharField(db_index=True, max_length=255)),
                ("step", models.CharField(max_length=64)),
                ("pid", models.IntegerField()),
                ("detail", models.TextField(blank=True, default="")),
            ],
        ),
    ]
